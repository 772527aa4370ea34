//! The flag groups of `rrhf score` that other commands share: the reward flags (`rrhf eval`, `rrhf iterate`) and
//! the policy log-prob flags (`rrhf rank`).

use std::path::PathBuf;

use serde::Serialize;

use crate::data::batch::Layout;

use super::ScoreOn;

/// How a response is scored (the reward flags of `rrhf score`, with its defaults).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RewardArgs {
    /// Sequences per reward-model forward.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Text a text-based reward sees: response, or full (query + response). Default: full for model:, response for
    /// vader.
    #[arg(long)]
    pub score_on: Option<ScoreOn>,
    /// Classifier label whose softmax probability is the reward (name from id2label, LABEL_i, or index).
    #[arg(long)]
    pub label: Option<String>,
    /// config.json of the reward model (for checkpoints that ship without one, e.g. Dahoas/gptj-rm-static).
    #[arg(long)]
    pub rm_config: Option<PathBuf>,
    /// tokenizer.json of the reward model.
    #[arg(long)]
    pub rm_tokenizer: Option<PathBuf>,
    /// Longest reward-model input in tokens (default: the model's position limit; 1024 for the Dahoas layout).
    #[arg(long)]
    pub rm_max_len: Option<usize>,
    /// Text between query and response (default: "" for sequence classifiers, " " for the Dahoas layout).
    #[arg(long)]
    pub rm_separator: Option<String>,
    /// Append EOS to the reward-model input (always on for the Dahoas layout).
    #[arg(long)]
    pub rm_append_eos: bool,
    /// Model name sent to the judge endpoint.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Environment variable holding the judge's API key.
    #[arg(long)]
    pub api_key_env: Option<String>,
}

impl Default for RewardArgs {
    /// The command-line defaults.
    fn default() -> Self {
        crate::cli_defaults()
    }
}

/// How the policy's log-probs are computed (a policy: reward and the KL term of `rrhf score`; `rrhf rank`).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct LogprobArgs {
    /// Exponent of the response length in p_i.
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    /// Queries per forward of the policy (all their responses go in one forward).
    #[arg(long, default_value_t = 8)]
    pub batch_queries: usize,
    /// packed: one row per query shared by its responses (faster); padded: one row per response.
    #[arg(long, default_value = "packed")]
    pub layout: Layout,
}

impl Default for LogprobArgs {
    /// The command-line defaults.
    fn default() -> Self {
        crate::cli_defaults()
    }
}
