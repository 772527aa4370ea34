//! Sequence log-probabilities of responses under a causal LM, with the tokenisation and batching of `rrhf train`
//! (design.md, "Tokenisation"): used for `policy:DIR` (p_i, the RRHF model as a reward model) and for the KL
//! penalty R̃ = R − β·(log π(y|x) − log ρ(y|x)) of the paper's §3.2 / §5.

use candle_core::Device;

use crate::data::batch::{build_batch, Layout};
use crate::data::tokenize::{tokenize_record, TokenizeOptions, TokenizedRecord};
use crate::data::Record;
use crate::model::seq_logprob::length_norm;
use crate::model::{LoadedModel, ModelError};

/// Per record, per response: Σ_t log π(y_t | x, y_<t) over the response tokens (EOS included) and the token count.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqLogprobs {
    pub logp: Vec<Vec<f64>>,
    pub n_tokens: Vec<Vec<usize>>,
}

impl SeqLogprobs {
    /// p_i = logp_i / |y_i|^length_penalty (Eq. 1).
    pub fn p(&self, length_penalty: f64) -> Vec<Vec<f64>> {
        self.logp
            .iter()
            .zip(&self.n_tokens)
            .map(|(lp, n)| {
                lp.iter()
                    .zip(n)
                    .map(|(&l, &n)| l / length_norm(n, length_penalty))
                    .collect()
            })
            .collect()
    }
}

/// How records are tokenised and batched for log-probs.
#[derive(Debug, Clone, Copy)]
pub struct LogprobOptions {
    pub tokenize: TokenizeOptions,
    pub layout: Layout,
    /// Queries per forward.
    pub batch_queries: usize,
}

/// Sequence log-probs of every response of `records` under `m`.
pub fn sequence_logprobs(
    m: &LoadedModel,
    records: &[&Record],
    opts: &LogprobOptions,
    device: &Device,
) -> Result<SeqLogprobs, ModelError> {
    m.check_max_len(opts.tokenize.max_len)?;
    let mut out = SeqLogprobs {
        logp: Vec::with_capacity(records.len()),
        n_tokens: Vec::with_capacity(records.len()),
    };
    let tokenized: Vec<TokenizedRecord> = records
        .iter()
        .map(|r| tokenize_record(&m.tokenizer, r, &opts.tokenize))
        .collect::<Result<_, _>>()?;
    for chunk in tokenized.chunks(opts.batch_queries.max(1)) {
        let refs: Vec<&TokenizedRecord> = chunk.iter().collect();
        let batch = build_batch(&refs, opts.layout, m.tokenizer.pad_id, device)?;
        let lp = m
            .model
            .label_logprobs(&batch.input, &batch.labels)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let mut sums = vec![0f64; batch.n_responses()];
        for (&x, &r) in lp.iter().zip(&batch.response_of_label) {
            sums[r as usize] += x as f64;
        }
        let mut off = 0;
        for n in &batch.n_tokens {
            out.logp.push(sums[off..off + n.len()].to_vec());
            out.n_tokens.push(n.clone());
            off += n.len();
        }
    }
    Ok(out)
}
