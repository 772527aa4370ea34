//! The reward flags shared by every command that scores responses (`rrhf eval`, `rrhf iterate`); `rrhf score`
//! spells the same flags out in its own config.

use std::path::PathBuf;

use serde::Serialize;

use super::{ScoreConfig, ScoreOn};

/// How a response is scored (the reward flags of `rrhf score`, with its defaults).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RewardArgs {
    /// Text a model: or vader reward sees: response or full (query + response).
    #[arg(long)]
    pub score_on: Option<ScoreOn>,
    /// Classifier label whose probability is the reward (model: classifiers).
    #[arg(long)]
    pub label: Option<String>,
    /// config.json of the reward model (checkpoints without one).
    #[arg(long)]
    pub rm_config: Option<PathBuf>,
    /// tokenizer.json of the reward model.
    #[arg(long)]
    pub rm_tokenizer: Option<PathBuf>,
    /// Longest reward-model input in tokens.
    #[arg(long)]
    pub rm_max_len: Option<usize>,
    /// Text between query and response for the reward model.
    #[arg(long)]
    pub rm_separator: Option<String>,
    /// Append EOS to the reward-model input.
    #[arg(long)]
    pub rm_append_eos: bool,
    /// Sequences per reward-model forward.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Model name sent to a judge: endpoint.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Environment variable holding the judge's API key.
    #[arg(long)]
    pub api_key_env: Option<String>,
}

impl RewardArgs {
    /// Copies these flags into an `rrhf score` config.
    pub fn apply(&self, s: &mut ScoreConfig) {
        s.batch_size = self.batch_size;
        s.score_on = self.score_on;
        s.label = self.label.clone();
        s.rm_config = self.rm_config.clone();
        s.rm_tokenizer = self.rm_tokenizer.clone();
        s.rm_max_len = self.rm_max_len;
        s.rm_separator = self.rm_separator.clone();
        s.rm_append_eos = self.rm_append_eos;
        s.judge_model = self.judge_model.clone();
        s.api_key_env = self.api_key_env.clone();
    }
}
