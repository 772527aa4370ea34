//! The flags that say how record files are read and tokenised, shared by every command that reads records.

use serde::Serialize;

use super::readers::{InputFormat, PromptTemplate, ReadOptions};
use super::tokenize::TokenizeOptions;

/// Input format, template and error policy of a record or prompt file (every command that reads one).
#[derive(Debug, Clone, Copy, clap::Args, Serialize)]
pub struct ReadArgs {
    /// Input format: auto, rrhf, pairwise, hh or alpaca.
    #[arg(long, default_value = "auto")]
    pub format: InputFormat,
    /// Template applied to queries (alpaca: the Stanford Alpaca prompt).
    #[arg(long, default_value = "none")]
    pub prompt_template: PromptTemplate,
    /// Skip (and count) malformed records instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
}

impl Default for ReadArgs {
    /// The command-line defaults.
    fn default() -> Self {
        crate::cli_defaults()
    }
}

impl ReadArgs {
    /// Reader options; `require_scores` refuses unscored records.
    pub fn options(&self, require_scores: bool) -> ReadOptions {
        ReadOptions {
            format: self.format,
            prompt_template: self.prompt_template,
            skip_invalid: self.skip_invalid,
            require_scores,
        }
    }
}

/// How record files are read, plus the length limits of their tokenisation.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RecordArgs {
    /// `--format`, `--prompt-template`, `--skip-invalid`.
    #[command(flatten)]
    #[serde(flatten)]
    pub read: ReadArgs,
    /// Tokens of query + response, at most (the paper: 192 for HH).
    #[arg(long, default_value_t = 192)]
    pub max_len: usize,
    /// Tokens of the query, at most (default max(max_len − 64, max_len / 2)); longer queries keep their end.
    #[arg(long)]
    pub max_query_len: Option<usize>,
    /// Do not end responses with EOS: for continuations cut at a token budget (`rrhf sample --max-new-tokens`),
    /// where an appended EOS would teach the model to stop there (an empty response keeps its EOS).
    #[arg(long)]
    pub no_response_eos: bool,
}

impl RecordArgs {
    /// Reader options; `require_scores` refuses unscored records.
    pub fn read_options(&self, require_scores: bool) -> ReadOptions {
        self.read.options(require_scores)
    }

    /// Tokenisation limits (an error message for inconsistent lengths).
    pub fn tokenize_options(&self) -> Result<TokenizeOptions, String> {
        let mut opts = TokenizeOptions::new(self.max_len, self.max_query_len)?;
        opts.response_eos = !self.no_response_eos;
        Ok(opts)
    }
}
