//! The RRHF loss (paper §3.1, design.md "The loss, exactly").
//!
//! For a query with responses y_i and rewards r_i:
//! - `p_i = Σ_t log π(y_i,t | x, y_i,<t) / |y_i|^length_penalty`                       (Eq. 1, `seq_logprob_norm`)
//! - `L_rank = Σ_{r_i < r_j} max(0, p_i − p_j + margin·(pos_i − pos_j))`, `pos_i = #{j : r_j > r_i}` (Eq. 2)
//! - `L_ft = −(1/|y_best|) Σ_t log π(y_best,t | …)` (mean; `sum` drops the 1/|y_best|), best = first argmax (Eq. 3–4)
//! - `L = rank_weight · L_rank + L_ft` (Eq. 5); a batch's loss is the mean over its queries.
//!
//! Unlike the original code, p_i divides by the response's own length (not the padded length), and the SFT term
//! averages over the best response's tokens only (not over padding).

use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::model::seq_logprob::seq_logprob_norm;
use crate::model::ModelError;

/// How the cross-entropy on the best response is reduced over its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SftReduction {
    /// Mean over the best response's tokens (the usual SFT cross-entropy).
    #[default]
    Mean,
    /// Plain sum, the paper's Eq. 4 literally.
    Sum,
}

impl FromStr for SftReduction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(Self::Mean),
            "sum" => Ok(Self::Sum),
            _ => Err(format!("unknown SFT reduction {s:?}: use mean or sum")),
        }
    }
}

impl std::fmt::Display for SftReduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mean => "mean",
            Self::Sum => "sum",
        })
    }
}

/// Hyper-parameters of the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// Weight of L_rank (the paper uses 1; 10 and 100 did worse).
    pub rank_weight: f64,
    /// Exponent of |y_i| in p_i.
    pub length_penalty: f64,
    /// BRIO-style margin λ per rank position (0: the paper's loss).
    pub margin: f64,
    pub sft_reduction: SftReduction,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            rank_weight: 1.0,
            length_penalty: 1.0,
            margin: 0.0,
            sft_reduction: SftReduction::Mean,
        }
    }
}

/// Per-query values of the loss terms, for logging.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryStats {
    /// Σ_t log π of each response.
    pub logp: Vec<f64>,
    /// p_i of each response.
    pub p: Vec<f64>,
    pub rank_loss: f64,
    pub sft_loss: f64,
    /// Fraction of ordered pairs (r_i < r_j) with p_i < p_j; `None` without pairs.
    pub rank_acc: Option<f64>,
    /// p of the best response (first argmax of r).
    pub p_best: f64,
    /// p of the worst response (first argmin of r).
    pub p_worst: f64,
}

/// The loss of a batch (a differentiable scalar) and its per-query terms.
#[derive(Debug)]
pub struct LossOutput {
    pub loss: Tensor,
    pub queries: Vec<QueryStats>,
}

/// `pos_i = #{j : r_j > r_i}`: position in descending reward order, ties sharing a position.
fn positions(scores: &[f64]) -> Vec<usize> {
    scores
        .iter()
        .map(|r| scores.iter().filter(|&&s| s > *r).count())
        .collect()
}

fn first_arg(scores: &[f64], better: impl Fn(f64, f64) -> bool) -> usize {
    let mut best = 0;
    for (i, &r) in scores.iter().enumerate() {
        if better(r, scores[best]) {
            best = i;
        }
    }
    best
}

/// The RRHF loss from the log-probs of every response token.
///
/// `token_logprobs` is `[N]`; `response_of_label[n]` is the global index of the response that token n belongs to
/// (queries in order, responses in order); `n_tokens[q][i]` and `scores[q][i]` give the length and reward of
/// response i of query q.
pub fn rrhf_loss(
    token_logprobs: &Tensor,
    response_of_label: &[u32],
    n_tokens: &[Vec<usize>],
    scores: &[Vec<f64>],
    cfg: &LossConfig,
) -> Result<LossOutput, ModelError> {
    let device = token_logprobs.device();
    let n_queries = n_tokens.len();
    if scores.len() != n_queries || scores.iter().zip(n_tokens).any(|(s, n)| s.len() != n.len()) {
        return Err(ModelError::Input(
            "every response needs exactly one score".into(),
        ));
    }
    // logp_i: sum of token log-probs per response; p_i = logp_i / |y_i|^length_penalty.
    let (logp, p) = seq_logprob_norm(
        token_logprobs,
        response_of_label,
        n_tokens,
        cfg.length_penalty,
    )?;

    // Pairs (worse i, better j) with their margin, the best response of each query and its SFT divisor.
    let (mut pi, mut pj, mut pq, mut pm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut best = Vec::with_capacity(n_queries);
    let mut sft_div = Vec::with_capacity(n_queries);
    let mut offset = 0u32;
    for (q, s) in scores.iter().enumerate() {
        let pos = positions(s);
        for i in 0..s.len() {
            for j in 0..s.len() {
                if s[i] < s[j] {
                    pi.push(offset + i as u32);
                    pj.push(offset + j as u32);
                    pq.push(q as u32);
                    pm.push((cfg.margin * (pos[i] as f64 - pos[j] as f64)) as f32);
                }
            }
        }
        let b = first_arg(s, |a, b| a > b);
        best.push(offset + b as u32);
        sft_div.push(match cfg.sft_reduction {
            SftReduction::Mean => n_tokens[q][b] as f32,
            SftReduction::Sum => 1.0,
        });
        offset += s.len() as u32;
    }
    let rank = if pi.is_empty() {
        Tensor::zeros(n_queries, DType::F32, device)?
    } else {
        let n_pairs = pi.len();
        let diff = p
            .index_select(&Tensor::new(pi.as_slice(), device)?, 0)?
            .sub(&p.index_select(&Tensor::new(pj.as_slice(), device)?, 0)?)?
            .add(&Tensor::from_vec(pm, n_pairs, device)?)?;
        Tensor::zeros(n_queries, DType::F32, device)?.index_add(
            &Tensor::new(pq.as_slice(), device)?,
            &diff.relu()?,
            0,
        )?
    };
    let sft = logp
        .index_select(&Tensor::new(best.as_slice(), device)?, 0)?
        .div(&Tensor::new(sft_div, device)?)?
        .neg()?;
    let per_query = ((rank.clone() * cfg.rank_weight)? + &sft)?;
    let loss = per_query.mean_all()?;

    // Host-side statistics for logging.
    let logp_h = logp.to_vec1::<f32>()?;
    let p_h = p.to_vec1::<f32>()?;
    let rank_h = rank.to_vec1::<f32>()?;
    let sft_h = sft.to_vec1::<f32>()?;
    let mut queries = Vec::with_capacity(n_queries);
    let mut off = 0;
    for (q, s) in scores.iter().enumerate() {
        let k = s.len();
        let p_q: Vec<f64> = p_h[off..off + k].iter().map(|&x| x as f64).collect();
        let (mut right, mut pairs) = (0usize, 0usize);
        for i in 0..k {
            for j in 0..k {
                if s[i] < s[j] {
                    pairs += 1;
                    right += usize::from(p_q[i] < p_q[j]);
                }
            }
        }
        queries.push(QueryStats {
            logp: logp_h[off..off + k].iter().map(|&x| x as f64).collect(),
            rank_loss: rank_h[q] as f64,
            sft_loss: sft_h[q] as f64,
            rank_acc: (pairs > 0).then(|| right as f64 / pairs as f64),
            p_best: p_q[first_arg(s, |a, b| a > b)],
            p_worst: p_q[first_arg(s, |a, b| a < b)],
            p: p_q,
        });
        off += k;
    }
    Ok(LossOutput { loss, queries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// One token per response, so p_i is the given log-prob itself.
    fn loss_of(p: &[f32], scores: &[f64], cfg: &LossConfig) -> (f64, Vec<f64>) {
        let v = Var::new(p, &Device::Cpu).unwrap();
        let ids: Vec<u32> = (0..p.len() as u32).collect();
        let out = rrhf_loss(
            v.as_tensor(),
            &ids,
            &[vec![1; p.len()]],
            &[scores.to_vec()],
            cfg,
        )
        .unwrap();
        let g = out.loss.backward().unwrap();
        let grad = g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        (
            out.loss.to_scalar::<f32>().unwrap() as f64,
            grad.iter().map(|&x| x as f64).collect(),
        )
    }

    #[test]
    fn ties_make_no_pair() {
        let cfg = LossConfig {
            rank_weight: 1.0,
            ..LossConfig::default()
        };
        // Rewards 1, 1: no pair whatever the p's; only the SFT term on the first response counts.
        let (l, g) = loss_of(&[-1.0, -3.0], &[1.0, 1.0], &cfg);
        assert!((l - 1.0).abs() < 1e-6);
        assert_eq!(g, vec![-1.0, 0.0]);
    }

    #[test]
    fn misordered_pair_is_penalised_by_its_gap() {
        // r_0 < r_1 but p_0 > p_1 by 2: L_rank = 2, L_ft = −p_1 = 3.
        let (l, g) = loss_of(&[-1.0, -3.0], &[0.0, 1.0], &LossConfig::default());
        assert!((l - 5.0).abs() < 1e-6, "{l}");
        assert_eq!(g, vec![1.0, -2.0]);
    }

    #[test]
    fn single_response_is_sft() {
        let (l, _) = loss_of(&[-2.5], &[0.3], &LossConfig::default());
        assert!((l - 2.5).abs() < 1e-6);
    }

    #[test]
    fn margin_scales_with_rank_gap() {
        let cfg = LossConfig {
            margin: 0.5,
            rank_weight: 1.0,
            ..LossConfig::default()
        };
        // Correctly ordered with gap 0.1 per step; margins 0.5 (adjacent) and 1.0 (two apart) make all 3 pairs active.
        let (l, _) = loss_of(&[-1.2, -1.1, -1.0], &[0.0, 1.0, 2.0], &cfg);
        let want = (-1.2f64 + 1.1 + 0.5) + (-1.2 + 1.0 + 1.0) + (-1.1 + 1.0 + 0.5) + 1.0;
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
    }
}
