//! p_i of the paper (Eq. 1): a response's log-probability under the model, divided by its length to the power
//! `length_penalty`. The one definition used by the loss (`train::loss`), `rrhf rank` (`eval::rank`) and the
//! policy reward (`score::logprob`).

use candle_core::{DType, Tensor};

use super::error::{ModelError, Result};

/// `|y_i|^length_penalty`, the divisor of p_i (a length of 0 counts as 1).
pub fn length_norm(n_tokens: usize, length_penalty: f64) -> f64 {
    (n_tokens.max(1) as f64).powf(length_penalty)
}

/// Per-response sums of token log-probs and p_i (Eq. 1), both `[responses]` f32.
///
/// `token_logprobs` is `[N]`; `response_of_label[n]` is the global index of the response that token n belongs to
/// (queries in order, responses in order); `n_tokens[q][i]` is the length of response i of query q.
pub fn seq_logprob_norm(
    token_logprobs: &Tensor,
    response_of_label: &[u32],
    n_tokens: &[Vec<usize>],
    length_penalty: f64,
) -> Result<(Tensor, Tensor)> {
    if n_tokens.is_empty() || n_tokens.iter().any(|n| n.is_empty() || n.contains(&0)) {
        return Err(ModelError::Input(
            "every query needs at least one response of at least one token".into(),
        ));
    }
    let device = token_logprobs.device();
    let n_resp: usize = n_tokens.iter().map(Vec::len).sum();
    let lp = token_logprobs.to_dtype(DType::F32)?;
    let seg = Tensor::new(response_of_label, device)?;
    let logp = Tensor::zeros(n_resp, DType::F32, device)?.index_add(&seg, &lp, 0)?;
    let norm: Vec<f32> = n_tokens
        .iter()
        .flatten()
        .map(|&n| length_norm(n, length_penalty) as f32)
        .collect();
    let p = logp.div(&Tensor::new(norm, device)?)?;
    Ok((logp, p))
}
