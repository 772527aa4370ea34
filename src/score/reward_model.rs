//! `--reward model:DIR`: rewards from a sequence-classification reward model or the Dahoas/gptj-rm-static layout.
//!
//! The text a reward model sees is what it was trained on:
//! - `*ForSequenceClassification` decoders (HH reward models trained on whole dialogues): `query + response`
//!   (`--rm-separator` between them, empty by default; `--rm-append-eos` adds EOS), read at the last non-pad token;
//! - the Dahoas/gptj-rm-static layout: `query + " " + response + eos` (trlx's reward function), read at the first
//!   EOS, left-truncated to 1024 tokens;
//! - BERT / DistilBERT classifiers (IMDB sentiment): `query + response`, as TRL's sentiment examples feed the
//!   classifier, right-truncated; the reward is the softmax probability of `--label`.
//!
//! `--score-on response` drops the query from the text.

use crate::data::Record;
use crate::model::reward::RewardModel;
use crate::model::ModelError;

use super::ScoreOn;

/// Scores responses with a loaded reward model.
pub struct ModelScorer {
    pub rm: RewardModel,
    /// Index of the label whose probability is the reward; `None`: the single logit.
    pub label: Option<usize>,
    pub score_on: ScoreOn,
    pub separator: String,
    pub append_eos: bool,
    /// Sequences per forward.
    pub batch_size: usize,
}

impl ModelScorer {
    /// Checks that the head and `--label` fit together and fills the layout's defaults.
    pub fn new(
        rm: RewardModel,
        label: Option<&str>,
        score_on: Option<ScoreOn>,
        separator: Option<&str>,
        append_eos: bool,
        batch_size: usize,
    ) -> Result<Self, ModelError> {
        let label = match (label, rm.num_labels()) {
            (Some(l), n) if n > 1 => Some(rm.label_index(l)?),
            (Some(l), _) => {
                return Err(ModelError::Input(format!(
                    "--label {l:?}: {} has a single output (a scalar reward); drop --label",
                    rm.arch
                )))
            }
            (None, 1) => None,
            (None, _) => {
                return Err(ModelError::Input(format!(
                    "{} is a classifier with labels {}: choose the rewarded one with --label",
                    rm.arch,
                    rm.labels.join(", ")
                )))
            }
        };
        let separator = separator
            .map(str::to_string)
            .unwrap_or_else(|| if rm.value_head { " " } else { "" }.to_string());
        Ok(Self {
            append_eos: append_eos || rm.value_head,
            label,
            score_on: score_on.unwrap_or(ScoreOn::Full),
            separator,
            batch_size: batch_size.max(1),
            rm,
        })
    }

    /// The text the model scores for one response.
    pub fn text(&self, query: &str, response: &str) -> String {
        match self.score_on {
            ScoreOn::Full => format!("{query}{}{response}", self.separator),
            ScoreOn::Response => response.to_string(),
        }
    }

    /// Token ids of one response's text.
    pub fn encode(&self, query: &str, response: &str) -> Result<Vec<u32>, ModelError> {
        self.rm.encode(&self.text(query, response), self.append_eos)
    }

    /// The reward of every response of `records`, batched over responses sorted by length.
    pub fn score(&self, records: &[&Record]) -> Result<Vec<Vec<f64>>, ModelError> {
        let mut items: Vec<(usize, usize, Vec<u32>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            for (j, resp) in r.responses.iter().enumerate() {
                items.push((i, j, self.encode(&r.query, resp)?));
            }
        }
        items.sort_by_key(|x| std::cmp::Reverse(x.2.len()));
        let mut out: Vec<Vec<f64>> = records
            .iter()
            .map(|r| vec![0.0; r.responses.len()])
            .collect();
        for batch in items.chunks(self.batch_size) {
            let rows: Vec<Vec<u32>> = batch.iter().map(|x| x.2.clone()).collect();
            let logits = self.rm.logits(&rows)?;
            for ((i, j, _), l) in batch.iter().zip(logits) {
                out[*i][*j] = self.reward_of(&l);
            }
        }
        Ok(out)
    }

    /// The reward from one row of head outputs.
    pub fn reward_of(&self, logits: &[f32]) -> f64 {
        match self.label {
            None => logits[0] as f64,
            Some(k) => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
                (logits[k] as f64 - max).exp() / z
            }
        }
    }
}
