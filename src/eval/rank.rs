//! `rrhf rank`: the policy as a reward model (paper §3.2, Table 5): p_i of every response, and the accuracy of p
//! at ordering responses like their rewards (chosen over rejected for pairwise data).

use std::io::Write;
use std::path::PathBuf;

use candle_core::Device;
use serde::Serialize;
use serde_json::json;

use crate::data::args::RecordArgs;
use crate::data::batch::build_batch;
use crate::data::prepare::prepare;
use crate::data::tokenize::TokenizedRecord;
use crate::data::DataError;
use crate::fsutil::write_atomic;
use crate::model::load::ModelArgs;
use crate::model::seq_logprob::seq_logprob_norm;
use crate::model::{LoadedModel, ModelError};
use crate::score::args::LogprobArgs;

/// Flags of `rrhf rank`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RankConfig {
    /// The policy to rank with (`--model`, `--device`, `--dtype`).
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Scored records (any format `rrhf train` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// JSONL output, one line per input record in input order: {"p", "logp_sum", "n_tokens"}.
    #[arg(long)]
    pub output: PathBuf,
    /// How --data is read and tokenised.
    #[command(flatten)]
    #[serde(flatten)]
    pub records: RecordArgs,
    /// `--length-penalty`, `--batch-queries`, `--layout`: the p_i of `rrhf score`'s policy: reward, so both agree.
    #[command(flatten)]
    #[serde(flatten)]
    pub logprob: LogprobArgs,
}

/// Summary of a ranking run.
#[derive(Debug, Clone, PartialEq)]
pub struct RankSummary {
    pub records: usize,
    /// Ordered pairs (r_i < r_j) over all records.
    pub pairs: usize,
    /// Fraction of those pairs with p_i < p_j.
    pub accuracy: Option<f64>,
}

/// An error of `rrhf rank`: reading the records or running the model.
#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
}

impl From<crate::fsutil::FsError> for RankError {
    fn from(e: crate::fsutil::FsError) -> Self {
        RankError::Model(e.into())
    }
}

impl From<candle_core::Error> for RankError {
    fn from(e: candle_core::Error) -> Self {
        RankError::Model(ModelError::Candle(e))
    }
}

/// Runs `rrhf rank`.
pub fn rank(cfg: &RankConfig) -> Result<RankSummary, RankError> {
    let (m, device) = cfg.model.load()?;
    rank_with_model(cfg, &m, &device)
}

/// Runs `rrhf rank` with the model already loaded on `device` (`cfg.model` is not read again).
pub fn rank_with_model(
    cfg: &RankConfig,
    m: &LoadedModel,
    device: &Device,
) -> Result<RankSummary, RankError> {
    m.check_max_len(cfg.records.max_len)?;
    let data = prepare(&cfg.data, &cfg.records, m)?;
    let mut out = Vec::new();
    let (mut pairs, mut right) = (0usize, 0usize);
    for chunk in data.records.chunks(cfg.logprob.batch_queries.max(1)) {
        let refs: Vec<&TokenizedRecord> = chunk.iter().collect();
        let batch = build_batch(&refs, cfg.logprob.layout, m.tokenizer.pad_id, device)?;
        let lp = m.model.label_logprobs(&batch.input, &batch.labels)?;
        let (logp, p) = seq_logprob_norm(
            &lp,
            &batch.response_of_label,
            &batch.n_tokens,
            cfg.logprob.length_penalty,
        )?;
        let (logp, p) = (logp.to_vec1::<f32>()?, p.to_vec1::<f32>()?);
        let mut off = 0;
        for (ns, r) in batch.n_tokens.iter().zip(chunk) {
            let s = &r.scores;
            let k = s.len();
            let p_q: Vec<f64> = p[off..off + k].iter().map(|&x| x as f64).collect();
            let logp_q: Vec<f64> = logp[off..off + k].iter().map(|&x| x as f64).collect();
            for i in 0..k {
                for j in 0..k {
                    if s[i] < s[j] {
                        pairs += 1;
                        right += usize::from(p_q[i] < p_q[j]);
                    }
                }
            }
            let line = json!({"p": p_q, "logp_sum": logp_q, "n_tokens": ns});
            writeln!(out, "{line}").map_err(|e| ModelError::io(&cfg.output, e))?;
            off += k;
        }
    }
    write_atomic(&cfg.output, &out)?;
    Ok(RankSummary {
        records: data.records.len(),
        pairs,
        accuracy: (pairs > 0).then(|| right as f64 / pairs as f64),
    })
}
