//! Perplexity of responses under an evaluator LM (the paper's §4.1 metric; gpt2-medium there): per response
//! exp(mean NLL of its tokens), averaged over responses as Hugging Face's perplexity metric reports
//! `mean_perplexity`.
//!
//! Tokens: the response is `encode(response, add_special_tokens = false)` with the evaluator's tokenizer, no EOS
//! (the text is judged, not where it stops). It is conditioned on `encode(query, add_special_tokens = true)`
//! ([`PplContext::Query`]) or on the evaluator's BOS alone ([`PplContext::None`]); with no context token at all
//! (no BOS) the first response token has nothing to be predicted from and is not scored. A response with no
//! scored token (empty, or a single token without context) has no perplexity: it is left out of the mean and
//! counted ([`PplSummary::excluded`]).
//!
//! Models with learned positions (GPT-2) see at most their `n_positions` tokens: the context is cut on the left
//! (keeping its BOS) to make room, and a response longer than the positions left is cut on the right; both are
//! counted ([`PplSummary::truncated`]).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::Serialize;

use crate::model::{Input, Labels, LoadedModel, ModelError};
use crate::sample::command::truncate_prompt;

/// What a response is conditioned on (`--ppl-context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PplContext {
    /// `encode(query, add_special_tokens = true)`.
    #[default]
    Query,
    /// The evaluator's BOS alone (nothing where it has none).
    None,
}

impl FromStr for PplContext {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "query" => Ok(Self::Query),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown perplexity context `{s}` (expected query or none)"
            )),
        }
    }
}

impl fmt::Display for PplContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Query => "query",
            Self::None => "none",
        })
    }
}

impl Serialize for PplContext {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The NLL of one response under the evaluator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResponseNll {
    /// Mean negative log-likelihood per scored token (nats); `None` when no token was scored.
    pub nll: Option<f64>,
    /// Response tokens scored.
    pub n_tokens: usize,
    /// Whether the context or the response was cut to fit the evaluator's positions.
    pub truncated: bool,
}

impl ResponseNll {
    /// exp(mean NLL), the response's perplexity.
    pub fn perplexity(&self) -> Option<f64> {
        self.nll.map(f64::exp)
    }
}

/// The per-response NLLs reduced to the metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PplSummary {
    /// Mean over responses with scored tokens of exp(mean NLL); `None` when no response has any.
    pub mean_perplexity: Option<f64>,
    /// Responses in the mean.
    pub n: usize,
    /// Responses left out: no scored token (empty responses).
    pub excluded: usize,
    /// Responses whose context or text was cut to the evaluator's positions.
    pub truncated: usize,
}

/// Hugging Face's `mean_perplexity` over `nlls`, with the counts of what was left out or cut.
pub fn summarize(nlls: &[ResponseNll]) -> PplSummary {
    let ppls: Vec<f64> = nlls.iter().filter_map(ResponseNll::perplexity).collect();
    PplSummary {
        mean_perplexity: (!ppls.is_empty()).then(|| ppls.iter().sum::<f64>() / ppls.len() as f64),
        n: ppls.len(),
        excluded: nlls.len() - ppls.len(),
        truncated: nlls.iter().filter(|n| n.truncated).count(),
    }
}

/// Context and response ids of one pair, cut to `max_positions` (see the module doc); whether anything was cut.
pub fn tokenize_pair(
    m: &LoadedModel,
    query: &str,
    response: &str,
    context: PplContext,
) -> Result<(Vec<u32>, Vec<u32>, bool), ModelError> {
    let tok = &m.tokenizer;
    let ctx = match context {
        PplContext::Query => tok.encode(query, true)?,
        PplContext::None => tok.bos_id.into_iter().collect(),
    };
    let mut resp = tok.encode(response, false)?;
    let Some(limit) = m.model.max_positions() else {
        return Ok((ctx, resp, false));
    };
    if ctx.len() + resp.len() <= limit {
        return Ok((ctx, resp, false));
    }
    // Keep one context token (the BOS where there is one) so that the first response token stays scored.
    let ctx_keep = limit.saturating_sub(resp.len()).max(ctx.len().min(1));
    let (ctx, _) = if ctx.is_empty() {
        (ctx, false)
    } else {
        truncate_prompt(ctx, ctx_keep, tok.bos_id)
    };
    resp.truncate(limit - ctx.len());
    Ok((ctx, resp, true))
}

/// The NLL of each `(query, response)` pair under the evaluator `m` on `device`, `batch_size` sequences per
/// forward (right-padded rows; padding changes nothing at real positions).
pub fn response_nlls(
    m: &LoadedModel,
    device: &Device,
    pairs: &[(&str, &str)],
    context: PplContext,
    batch_size: usize,
) -> Result<Vec<ResponseNll>, ModelError> {
    let mut out = vec![
        ResponseNll {
            nll: None,
            n_tokens: 0,
            truncated: false,
        };
        pairs.len()
    ];
    // (pair index, ids, first scored position) of the pairs with at least one scored token.
    let mut rows: Vec<(usize, Vec<u32>, usize)> = Vec::new();
    for (i, (query, response)) in pairs.iter().enumerate() {
        let (ctx, resp, truncated) = tokenize_pair(m, query, response, context)?;
        out[i].truncated = truncated;
        // Position t is predicted from position t − 1: with no context the first token is not scored.
        let first = ctx.len().max(1);
        let ids: Vec<u32> = ctx.into_iter().chain(resp).collect();
        if ids.len() > first {
            rows.push((i, ids, first));
        }
    }
    for batch in rows.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = batch.iter().map(|(_, ids, _)| ids.clone()).collect();
        let input = Input::causal(&seqs, m.tokenizer.pad_id, device)?;
        let (_, t) = input.dims();
        let mut labels = Labels {
            flat_positions: Vec::new(),
            ids: Vec::new(),
        };
        for (r, (_, ids, first)) in batch.iter().enumerate() {
            for (p, &id) in ids.iter().enumerate().skip(*first) {
                labels.flat_positions.push((r * t + p - 1) as u32);
                labels.ids.push(id);
            }
        }
        let lp = m
            .model
            .label_logprobs(&input, &labels)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let mut at = 0;
        for (i, ids, first) in batch {
            let n = ids.len() - first;
            let sum: f64 = lp[at..at + n].iter().map(|&x| f64::from(x)).sum();
            at += n;
            out[*i].nll = Some(-sum / n as f64);
            out[*i].n_tokens = n;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nll(x: Option<f64>, n: usize) -> ResponseNll {
        ResponseNll {
            nll: x,
            n_tokens: n,
            truncated: false,
        }
    }

    #[test]
    fn mean_perplexity_averages_per_response_perplexities_and_counts_empty_ones() {
        let s = summarize(&[nll(Some(0.0), 3), nll(Some(2f64.ln()), 1), nll(None, 0)]);
        assert_eq!((s.n, s.excluded, s.truncated), (2, 1, 0));
        assert!((s.mean_perplexity.unwrap() - 1.5).abs() < 1e-12);
        assert_eq!(summarize(&[nll(None, 0)]).mean_perplexity, None);
    }

    #[test]
    fn context_names_round_trip() {
        for c in [PplContext::Query, PplContext::None] {
            assert_eq!(c.to_string().parse::<PplContext>().unwrap(), c);
        }
        assert!("bos".parse::<PplContext>().unwrap_err().contains("query"));
    }
}
